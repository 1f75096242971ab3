"""PostgreSQL: pool, column list, indexes, migrations, store, search, audit and plan."""
