"""`ticketing bench flash-sale`: the on-sale minute, measured against a ceiling."""
