"""Running diffserve on other serving systems (each module needs its own optional extra)."""
