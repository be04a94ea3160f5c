package provision

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"
)

var sizeRE = regexp.MustCompile(`^([0-9]{1,15})([KMGT]?)(I?B)?$`)

// ParseSize reads a size such as 2G, 512M, 2GiB or 1073741824 (bytes). Units are
// binary: K is 1024.
func ParseSize(s string) (uint64, error) {
	m := sizeRE.FindStringSubmatch(strings.ToUpper(strings.TrimSpace(s)))
	if m == nil {
		return 0, fmt.Errorf("want a size such as 512M or 2G")
	}
	n, _ := strconv.ParseUint(m[1], 10, 64)
	shift := map[string]uint{"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m[2]]
	if n > (1<<63)>>shift {
		return 0, fmt.Errorf("want a size below 8 EiB")
	}
	return n << shift, nil
}

// FormatSize writes bytes the way ParseSize reads them, in the largest exact unit.
func FormatSize(b uint64) string {
	for _, u := range []struct {
		s     string
		shift uint
	}{{"T", 40}, {"G", 30}, {"M", 20}, {"K", 10}} {
		if b != 0 && b%(1<<u.shift) == 0 {
			return strconv.FormatUint(b>>u.shift, 10) + u.s
		}
	}
	return strconv.FormatUint(b, 10)
}

// HumanSize is b for people, rounded: "235.4 GiB", "512 MiB".
func HumanSize(b uint64) string {
	for _, u := range []struct {
		s     string
		shift uint
	}{{"TiB", 40}, {"GiB", 30}, {"MiB", 20}, {"KiB", 10}} {
		if b >= 1<<u.shift {
			v := fmt.Sprintf("%.1f", float64(b)/float64(uint64(1)<<u.shift))
			if len(v) > 4 || strings.HasSuffix(v, ".0") { // 100 and more, or whole
				v = v[:len(v)-2]
			}
			return v + " " + u.s
		}
	}
	return fmt.Sprintf("%d bytes", b)
}
