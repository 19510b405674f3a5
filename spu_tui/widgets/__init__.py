"""The console's widgets; each draws one view of a ``RunModel``."""
