-- A second database beside Airflow's: the serving request log flywheel_monitoring reads.
CREATE DATABASE requests OWNER airflow;
