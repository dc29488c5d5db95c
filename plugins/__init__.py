"""deepgate's APISIX external plugins and the runner that serves them."""
