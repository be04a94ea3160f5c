package provision

import (
	"strconv"
	"strings"
	"testing"
)

// records parses what slog's TextHandler wrote (key=value, values quoted where needed)
// into one map per line: tests assert on the records the tool logs (their attributes)
// where its prose is not the contract.
func records(t *testing.T, log string) []map[string]string {
	t.Helper()
	var out []map[string]string
	for _, line := range strings.Split(strings.TrimSpace(log), "\n") {
		rec := map[string]string{}
		for rest := line; rest != ""; {
			rest = strings.TrimLeft(rest, " ")
			k, v, ok := strings.Cut(rest, "=")
			if !ok {
				break
			}
			if strings.HasPrefix(v, `"`) {
				q, err := strconv.QuotedPrefix(v)
				if err != nil {
					t.Fatalf("log line %q: %v", line, err)
				}
				rest = v[len(q):]
				v, _ = strconv.Unquote(q)
			} else {
				v, rest, _ = strings.Cut(v, " ")
			}
			rec[k] = v
		}
		out = append(out, rec)
	}
	return out
}

// record is the first of recs that has every attribute of want (a value of "*": any),
// or nil.
func record(recs []map[string]string, want map[string]string) map[string]string {
	for _, r := range recs {
		ok := true
		for k, v := range want {
			if got, has := r[k]; !has || (v != "*" && got != v) {
				ok = false
				break
			}
		}
		if ok {
			return r
		}
	}
	return nil
}

func TestRecords(t *testing.T) {
	recs := records(t, `time=2026-12-07T12:00:00Z level=INFO msg="systemd running after 1.2 s more" system_ms=1200 state=running
time=2026-12-07T12:00:01Z level=WARN msg="a \"quoted\" word" n=1`)
	if r := record(recs, map[string]string{"state": "running", "system_ms": "*"}); r == nil || r["system_ms"] != "1200" {
		t.Fatalf("no systemd record in %v", recs)
	}
	if r := record(recs, map[string]string{"level": "WARN"}); r == nil || r["msg"] != `a "quoted" word` {
		t.Fatalf("quoted values: %v", recs)
	}
	if record(recs, map[string]string{"state": "degraded"}) != nil {
		t.Fatal("matched a record without the value")
	}
}
