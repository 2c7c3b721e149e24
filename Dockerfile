FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY lua ./lua
COPY migrations ./migrations
COPY docs ./docs
# Editable install: the code finds lua/, migrations/ and docs/ beside service/.
RUN pip install --no-cache-dir -e .
USER nobody
