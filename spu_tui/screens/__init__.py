"""The run screen, and the modal screens over it: help, quit, export."""
