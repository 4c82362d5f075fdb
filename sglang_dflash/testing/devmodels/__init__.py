"""Small models for tests, demos and the CPU benchmark: built in code or unpacked from
PyPI, never downloaded from a hub."""
