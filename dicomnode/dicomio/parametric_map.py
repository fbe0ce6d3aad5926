"""Heat-map series (uint16 Parametric Map with a Real World Value Mapping, highdicom)."""
