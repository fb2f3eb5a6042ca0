"""How we reason about speed without running anything: the device model, the
generic roofline, the PTX/SASS audit of every registered kernel, provenance."""
