"""Airflow (the DAGs' tasks, a local standalone) and runs as DVC experiments, on the graph of dvc.yaml."""
