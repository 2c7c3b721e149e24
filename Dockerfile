FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY lua ./lua
COPY migrations ./migrations
# Editable install: the code finds lua/ and migrations/ beside service/.
RUN pip install --no-cache-dir -e .
USER nobody
