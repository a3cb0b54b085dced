"""The transport: every pycurl handle is set up, retried and translated into errors here."""
