"""Optional integrations with training frameworks (imported explicitly, never by ``import chase``)."""
