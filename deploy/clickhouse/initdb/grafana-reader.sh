#!/bin/bash
# Run once by the clickhouse-server image, on the first start of an empty data volume
# (/docker-entrypoint-initdb.d): a read-only user for Grafana's ClickHouse datasource, as the
# plugin's documentation recommends. readonly = 2 lets the plugin set query settings but never write;
# it may read only the freshrec database.
set -euo pipefail
clickhouse client --host 127.0.0.1 --user "${CLICKHOUSE_USER}" --password "${CLICKHOUSE_PASSWORD}" --multiquery <<SQL
CREATE USER IF NOT EXISTS ${GRAFANA_CLICKHOUSE_USER:-grafana}
    IDENTIFIED WITH sha256_password BY '${GRAFANA_CLICKHOUSE_PASSWORD}'
    SETTINGS readonly = 2;
GRANT SELECT ON ${CLICKHOUSE_DB:-freshrec}.* TO ${GRAFANA_CLICKHOUSE_USER:-grafana};
SQL
