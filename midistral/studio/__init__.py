"""The studio: a local web page over the sampler (generate, continue, add or replace a track; hear the
result with a General MIDI SoundFont, see its piano roll, download the MIDI).

    python -m midistral.studio --ckpt runs/chorales

settings.py reads and bounds the page's form, jobs.py runs one generation at a time on the loaded
model, app.py is the FastAPI app, edge.py checks every request before the app reads it (host, origin,
body size, slow clients), static/ the page (plain HTML, CSS and JavaScript, nothing from the internet).
"""
