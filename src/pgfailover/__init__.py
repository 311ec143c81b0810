"""Keep psycopg 3 applications writing through a PostgreSQL failover."""
