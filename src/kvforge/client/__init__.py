"""Client tools for an OpenAI-compatible server: the load generator (`kvforge loadtest`) and the
catalogue of faulty requests the hardening tests and `scripts/hostile.py` send."""
