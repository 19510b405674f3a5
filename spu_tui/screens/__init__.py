"""Modal screens: help, quit, export."""
