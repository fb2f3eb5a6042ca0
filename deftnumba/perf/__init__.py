"""How we reason about speed without running anything: static audits and models."""
