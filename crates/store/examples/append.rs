//! Group-commit throughput of `append_sends`, the chat writer's one store call, without the
//! server: R rooms of U members, batches of B messages from random members, 100-byte texts.
//!
//! ```sh
//! cargo run --release -p switchboard-store --example append -- sqlite:///tmp/append.db 200 4 400 200
//! cargo run --release -p switchboard-store --example append -- postgres://postgres@127.0.0.1:5432/test 200 4 400 200
//! ```
//! Arguments: URL, rooms, users per room, batch size, batches. Prints one line per 20
//! batches and a summary.

use std::time::{Duration, Instant};

use switchboard_store::{MemberRole, NewMessage, NewRoom, NewUser, RoomKind, UserRole};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let url = args
        .get(1)
        .map(String::as_str)
        .unwrap_or("sqlite:///tmp/append.db");
    let arg = |i: usize, d: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let (rooms, users, batch, batches) = (arg(2, 200), arg(3, 4), arg(4, 400), arg(5, 200));
    let store = switchboard_store::open(url).await?;
    let run = rand::random::<u32>();
    let mut members = Vec::new();
    for r in 0..rooms {
        let mut ids = Vec::new();
        for u in 0..users {
            let user = store
                .create_user(NewUser {
                    username: format!("append-{run}-{r}-{u}"),
                    password_hash: String::new(),
                    display_name: "bench".into(),
                    role: UserRole::User,
                })
                .await?;
            ids.push(user.id);
        }
        let room = store
            .create_room(NewRoom {
                kind: RoomKind::Public,
                name: format!("append-{run}-{r}"),
                created_by: ids[0],
            })
            .await?;
        for &id in &ids[1..] {
            store.add_member(room.id, id, MemberRole::Member).await?;
        }
        members.push((room.id, ids));
    }
    let text = "x".repeat(100);
    let io0 = io_bytes().unwrap_or((0, 0));
    let (mut total, mut window, mut worst) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let mut seq = 0u64;
    for b in 1..=batches {
        let msgs: Vec<NewMessage> = (0..batch)
            .map(|_| {
                let (room, ids) = &members[rand::random_range(0..members.len())];
                let user = ids[rand::random_range(0..ids.len())];
                seq += 1;
                NewMessage {
                    room_id: *room,
                    user_id: user,
                    client_msg_id: Some(format!("{run}-{user}-{seq}")),
                    text: text.clone(),
                    reply_to: None,
                }
            })
            .collect();
        let t = Instant::now();
        let results = store.append_sends(msgs).await;
        let took = t.elapsed();
        if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
            return Err(format!("append failed: {e}").into());
        }
        total += took;
        window += took;
        worst = worst.max(took);
        if b % 20 == 0 {
            println!(
                "batches {b}: {:.1} ms/batch, {:.1} µs/msg, worst {:.1} ms",
                window.as_secs_f64() * 1e3 / 20.0,
                window.as_secs_f64() * 1e6 / (20 * batch) as f64,
                worst.as_secs_f64() * 1e3
            );
            window = Duration::ZERO;
            worst = Duration::ZERO;
        }
    }
    let n = (batches * batch) as f64;
    let written = io_bytes().map(|(w, c)| (w - io0.0, c - io0.1));
    println!(
        "total: {:.0} msgs/s of store time, {:.1} µs/msg, {}",
        n / total.as_secs_f64(),
        total.as_secs_f64() * 1e6 / n,
        match written {
            Some((w, c)) => format!(
                "{:.0} B written/msg ({:.0} B to the OS)",
                w as f64 / n,
                c as f64 / n
            ),
            None => "no /proc/self/io".into(),
        }
    );
    Ok(())
}

/// `(write_bytes, wchar)` of this process: bytes sent to the disk, and bytes passed to write
/// calls.
fn io_bytes() -> Option<(u64, u64)> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    let field = |name: &str| {
        io.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
    };
    Some((field("write_bytes:")?, field("wchar:")?))
}
