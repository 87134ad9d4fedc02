"""Helpers with no knowledge of models or AMP: files, processes, progress, torch."""
