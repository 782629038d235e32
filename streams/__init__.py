"""Stream processors (faust-streaming agents): sequencing, dedupe, fan-out, routing."""
