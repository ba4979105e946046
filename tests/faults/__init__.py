"""TCP fault injection for tests: a loopback proxy that can delay, drop, black-hole or refuse connections."""
