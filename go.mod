module sinc.dev/sinc

go 1.26.0

require (
	github.com/BurntSushi/toml v1.6.0 // indirect
	github.com/flynn/noise v1.1.0 // indirect
	go.uber.org/goleak v1.3.0 // indirect
	golang.org/x/crypto v0.59.0 // indirect
	golang.org/x/sys v0.50.0 // indirect
)
