"""`lmforge studio`: a local web app over a workspace of run directories (see docs/studio.md)."""
