"""The evaluate stage, its scorers, the hallucination detector and the report page."""
