"""A module slow to import: keeps a test fork server from listening for a second."""

import time

time.sleep(1.0)
