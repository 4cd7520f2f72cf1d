"""One module per method; each exports a factory that returns a pure ``Step``."""
