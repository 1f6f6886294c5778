"""Images: the central catalogue, the local cache, and the safety checks on image files.

The VM layer needs one call::

    with acquire_image(settings, "debian-12", job_id=job_id) as lease:
        base = lease.image.path      # verified, read-only, format in lease.image.format

Everything else here serves the CLI (``glite-vm images|cache|catalogue``), the advertiser
(:class:`ImageCache` status) and the central repository's admin (:func:`build_catalogue`).
"""
