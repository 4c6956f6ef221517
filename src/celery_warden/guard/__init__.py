"""The guard: recycle fat children, unhang stuck ones and reap orphans, safely."""
