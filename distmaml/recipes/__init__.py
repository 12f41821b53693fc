"""The built-in recipes (the YAML files beside this module) and their table (``catalog``)."""
