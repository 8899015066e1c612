"""Raw-format fixtures written by tests."""
