"""The CloudSigma API: endpoints and credentials, the JSON API, drives."""
