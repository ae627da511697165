-- One PostgreSQL server, two databases: Optuna's study storage and MLflow's backend store.
CREATE DATABASE mlflow;
