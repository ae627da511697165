# The image of the MLflow server and of the sweep workers (docker-compose.yml). Both run as the
# unprivileged user "sweeper", not root.
FROM python:3.11-slim
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 SWEEPER_DATA_DIR=/app/data
COPY setup.cfg pyproject.toml README.md ./
COPY trainers trainers
COPY sweeper sweeper
COPY studies studies
COPY configs configs
# torch and torchvision unpinned together (a matching pair; CUDA-enabled wheels from PyPI), plus the
# PostgreSQL driver for Optuna's and MLflow's shared storage. Compiled now: the user cannot write /app.
RUN pip install -e '.[postgres]' && python -m compileall -q sweeper trainers
# The user, and the mount points of the compose volumes owned by it: a new named volume takes the
# owner of its mount point, so the workers can write data/ and mlruns/, the server its artifacts.
RUN useradd --create-home --uid 1000 --user-group sweeper \
    && mkdir -p /app/data /app/mlruns /mlartifacts \
    && chown sweeper:sweeper /app/data /app/mlruns /mlartifacts
USER sweeper
ENTRYPOINT ["sweeper"]
CMD ["--help"]
