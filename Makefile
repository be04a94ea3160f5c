# libvirt-gci. The two commands that matter (see README.rst):
#   make demo   build the tool, set up local libvirt and a tiny template, run a sample job in a VM
#   make test   set up the same, then run every test, the real-VM ones included
GO       ?= go
BIN      := bin/libvirt-gci
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -s -w -X main.version=$(VERSION)
SOURCES  := $(shell find . -name '*.go' -not -path './bin/*') go.mod go.sum

.PHONY: all build demo test unit lint bench fuzz soak testenv testrunner install deb clean

all: build

build: $(BIN)

$(BIN): $(SOURCES)
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $@ ./cmd/libvirt-gci

# Install the binary, its man page and bash completion, the gc service and timer, the
# drop-in giving gitlab-runner.service /etc/default/libvirt-gci, and that file (unless
# there is one). `make deb` packages the same.
PREFIX  ?= /usr/local
UNITDIR ?= /etc/systemd/system
install: $(BIN)
	scripts/install.sh $(BIN) "$(DESTDIR)" $(PREFIX) $(UNITDIR)

# A Debian package (dpkg-deb) in bin/: its version grows with every commit, so that a
# newer build upgrades an older one.
DEB_VERSION ?= 0.$(shell git rev-list --count HEAD 2>/dev/null || echo 0)+g$(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
deb:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '-s -w -X main.version=$(DEB_VERSION)' -o bin/deb/libvirt-gci ./cmd/libvirt-gci
	scripts/deb.sh bin/deb/libvirt-gci bin $(DEB_VERSION)

testenv:
	scripts/testenv.sh setup

# The gitlab-runner the runner tests drive (built once if there is none): not for the demo.
testrunner:
	scripts/testenv.sh runner

# The demo needs the tiny guest only.
demo: build
	scripts/testenv.sh setup tiny
	scripts/demo.sh $(BIN)

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); [ -z "$$out" ] || { echo "gofmt needed: $$out"; exit 1; }
	$(GO) vet ./...

# The real-VM tests fail (not skip) when their environment is missing: LIBVIRT_GCI_E2E=1.
# PARALLEL real-VM tests at once (go test's default is one per core): much of their time
# is spent waiting for a guest (timeouts, suspended or frozen guests, a runner's poll).
PARALLEL ?= 4
# (testenv and testrunner in one step: the gitlab-runner builds while the images do.)
test: lint
	scripts/testenv.sh test
	eval "$$(scripts/testenv.sh env)" && LIBVIRT_GCI_E2E=1 $(GO) test -race -count=1 -parallel $(PARALLEL) -timeout 30m ./...

# Unit tests only: no libvirt needed.
unit:
	$(GO) test -race -count=1 -short ./...

# BenchmarkPerformance prints README's Performance table (each figure a median of its own
# runs); the others report per-stage timings.
bench:
	scripts/testenv.sh test
	eval "$$(scripts/testenv.sh env)" && LIBVIRT_GCI_E2E=1 $(GO) test -run '^$$' -bench '^BenchmarkPerformance$$' -benchtime 1x -timeout 30m ./cmd/libvirt-gci
	eval "$$(scripts/testenv.sh env)" && LIBVIRT_GCI_E2E=1 $(GO) test -run '^$$' -bench . -skip '^BenchmarkPerformance' -benchtime 5x -timeout 30m ./cmd/libvirt-gci

# SOAK_N jobs, SOAK_M at a time, each with the next fault kind in turn (SOAK_KINDS: a
# comma-separated few of them); one summary line (nothing left, nothing unexpected).
# SOAK_TIMEOUT bounds a run: 1,000 jobs take hours on 2 cores; run them in pieces, each
# with a SOAK_SEED of its own (where in the turn it starts, which strikes it draws).
SOAK_N ?= 20
SOAK_M ?= 4
SOAK_SEED ?= 0
SOAK_KINDS ?=
SOAK_TIMEOUT ?= 3h
soak: testenv
	eval "$$(scripts/testenv.sh env)" && LIBVIRT_GCI_E2E=1 LIBVIRT_GCI_SOAK=1 SOAK_N=$(SOAK_N) SOAK_M=$(SOAK_M) SOAK_SEED=$(SOAK_SEED) SOAK_KINDS='$(SOAK_KINDS)' $(GO) test -count=1 -v -run '^TestSoak$$' -timeout $(SOAK_TIMEOUT) ./cmd/libvirt-gci

# Each fuzz target for FUZZTIME (its seed corpus also runs in every `make test`).
FUZZTIME ?= 30s
fuzz:
	for p in ./executor ./provision; do for f in $$($(GO) test -list '^Fuzz' $$p | grep ^Fuzz); do $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) $$p || exit 1; done; done

clean:
	rm -rf bin
