"""drivepipe's own stages, one module each, registered through entry points."""
