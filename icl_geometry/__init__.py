"""Orchestration of the toolkit: the command line and the one-command study."""
