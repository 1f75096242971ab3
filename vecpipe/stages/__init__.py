"""What every stage shares: the record boundary, the settle step, and isolating a poison record."""
