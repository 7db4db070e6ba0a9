"""Host adapters.  Each imports its host (torch, ComfyUI) only when used."""
