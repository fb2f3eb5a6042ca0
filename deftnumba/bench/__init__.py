"""How we measure: a generic harness over registered ops (``bench.harness``) and
the charts drawn from its CSVs (``bench.plots``)."""
