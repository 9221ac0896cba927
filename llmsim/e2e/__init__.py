"""End-to-end validation against measured serving runs (``llmsim validate-e2e``)."""
