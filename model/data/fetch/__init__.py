"""`dr data media`: fetch the media a dataset's rows name from a sources table (path, url, segment), resumably.

sources.py reads and checks the table, recipes.py writes one from public metadata, download.py fetches, cuts and
verifies one file, outcomes.py journals what happened and reports it, job.py runs it all under the media root's lock.
"""
