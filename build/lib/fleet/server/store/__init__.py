"""fleetd's store: peewee models over SQLite, migrations, and the store thread."""
