"""What the lab tells a monitor: Prometheus metrics (`metrics`) and OpenTelemetry traces
(`tracing`, and `kernel` for the spans a notebook's kernel hands back). Both cost nothing until
a lab, a service or the environment turns them on."""
