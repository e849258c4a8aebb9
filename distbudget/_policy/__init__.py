"""The failure policy: what budgets do when Redis does not answer (``guard.py``), and the local
journal of charges waiting for replay (``journal.py``). No redis import: engines classify their errors."""
