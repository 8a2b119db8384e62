"""Stage 4, serving: the Ray Serve application that hosts trained rankers behind HTTP."""
