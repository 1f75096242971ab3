"""Dead letters: the header contract, sending, the rate guard, and picking records to replay."""
