# The image of the MLflow server and of the sweep workers (docker-compose.yml).
FROM python:3.11-slim
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 SWEEPER_DATA_DIR=/app/data
COPY setup.cfg pyproject.toml README.md ./
COPY trainers trainers
COPY sweeper sweeper
COPY studies studies
COPY configs configs
# torch and torchvision unpinned together (a matching pair; CUDA-enabled wheels from PyPI), plus the
# PostgreSQL driver for Optuna's and MLflow's shared storage.
RUN pip install -e '.[postgres]'
ENTRYPOINT ["sweeper"]
CMD ["--help"]
