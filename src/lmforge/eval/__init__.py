"""Evaluation and reports (plots of training runs; metrics and tasks land here next)."""
