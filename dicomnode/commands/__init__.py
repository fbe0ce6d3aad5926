"""Command-line handlers, one module per command group; ``dicomnode.cli`` parses and dispatches here."""
