# The project image: the pinned stack from requirements.lock, entrypoint `dnc`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TF_USE_LEGACY_KERAS=1

WORKDIR /app
COPY requirements.lock /app/requirements.lock
RUN pip install --no-cache-dir --no-deps --require-hashes -r /app/requirements.lock

COPY setup.py dnc_env.py /app/
COPY preprocessing /app/preprocessing
COPY trainer /app/trainer
COPY serving /app/serving
COPY pipeline /app/pipeline
RUN pip install --no-cache-dir --no-deps --no-build-isolation /app

ENTRYPOINT ["dnc"]
CMD ["--help"]
